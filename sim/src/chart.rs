//! The chart of a sweep: each metric against the number of nodes, one panel per metric, as a
//! PNG.

use std::path::Path;

use anyhow::{anyhow, Context};
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;

/// Fonts tried for the chart's text, in order (`KUBELT_SIM_FONT` first when set).
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// One panel: its title and the series it draws, each a field of the runs' reports.
struct Panel {
    title: &'static str,
    series: &'static [(&'static str, &'static str)],
}

const PANELS: [Panel; 8] = [
    Panel { title: "DHT lookup hops", series: &[("p50", "lookup_hops_p50"), ("p99", "lookup_hops_p99")] },
    Panel { title: "DHT lookup time (ms)", series: &[("p50", "lookup_ms_p50"), ("p99", "lookup_ms_p99")] },
    Panel { title: "Propagation to every replica (ms)", series: &[("p50", "propagation_p50_ms"), ("p99", "propagation_p99_ms"), ("max", "propagation_max_ms")] },
    Panel {
        title: "Gossip bytes per change",
        series: &[("per replica", "gossip_bytes_per_node_per_change"), ("per node of the network", "gossip_bytes_per_network_node_per_change"), ("non-replicas, total", "non_replica_gossip_bytes")],
    },
    Panel { title: "Connections per node (idle)", series: &[("mean", "connections_per_node"), ("most", "connections_max"), ("routing table", "routing_table_per_node")] },
    Panel { title: "Memory per node (KiB)", series: &[("RSS delta / node", "memory_per_node_kib")] },
    Panel { title: "CPU ms per node per second (idle)", series: &[("idle", "cpu_ms_per_node_per_second_idle")] },
    Panel { title: "Connections opened per node per second (idle)", series: &[("opened", "connections_opened_per_node_per_s_idle")] },
];

fn font() -> anyhow::Result<&'static [u8]> {
    let chosen = std::env::var("KUBELT_SIM_FONT").ok();
    for path in chosen.iter().map(String::as_str).chain(FONTS) {
        if let Ok(bytes) = std::fs::read(path) {
            return Ok(Box::leak(bytes.into_boxed_slice()));
        }
    }
    Err(anyhow!("no TTF font for the chart's text: install fonts-dejavu-core or set KUBELT_SIM_FONT"))
}

fn field(run: &Value, name: &str) -> Option<f64> {
    run.get(name).and_then(Value::as_f64)
}

/// Draws `runs` (reports of runs of different sizes) into a PNG at `path`.
pub(crate) fn draw(runs: &[Value], path: &Path) -> anyhow::Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, font()?).map_err(|_| anyhow!("the chart's font is not a valid TTF"))?;
    let root = BitMapBackend::new(path, (2000, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(40);
    let seed = runs.first().and_then(|r| r.get("seed")).and_then(Value::as_u64).unwrap_or(0);
    title.titled(&format!("kubelt-sim: the real kubelt-protocol swarm on the memory transport, by network size (seed {seed})"), ("sans-serif", 22))?;
    let sizes: Vec<f64> = runs.iter().filter_map(|r| field(r, "nodes")).collect();
    let (x_min, x_max) = (sizes.iter().copied().fold(f64::MAX, f64::min), sizes.iter().copied().fold(0.0, f64::max));
    let colors = [BLUE, RED, RGBColor(0, 150, 0), MAGENTA];
    for (area, panel) in body.split_evenly((2, 4)).iter().zip(PANELS.iter()) {
        let points: Vec<Vec<(f64, f64)>> = panel.series.iter().map(|(_, key)| runs.iter().filter_map(|r| Some((field(r, "nodes")?, field(r, key)?))).collect()).collect();
        let y_max = points.iter().flatten().map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d((x_min * 0.9)..(x_max * 1.05).max(x_min + 1.0), 0.0..y_max)
            .context("a panel of the chart")?;
        chart.configure_mesh().x_desc("nodes").label_style(("sans-serif", 13)).draw()?;
        for (i, ((label, _), series)) in panel.series.iter().zip(points).enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))?
                .label(*label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart.draw_series(series.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).label_font(("sans-serif", 13)).position(SeriesLabelPosition::UpperLeft).draw()?;
    }
    root.present().context("writing the chart")?;
    Ok(())
}
