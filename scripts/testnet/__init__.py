"""The testnet's scenarios and measurements (`scripts/testnet.sh scenario ...` runs them).

`scripts/testnet.sh` keeps the lifecycle (image, docker-compose up/down, logs); everything that
reads the nodes' answers and measures lives here, one module per scenario, on top of
`common.py` (the layout, one shell per container for JSON-RPC calls, waits, percentiles).
Standard library only; run from scripts/ as `python3 -m testnet`.
"""
