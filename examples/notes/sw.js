// The notes app's service worker: keeps the app's own files in the browser, so that the page
// also opens while its node cannot be reached (the notes and the edits waiting to be sent are
// in localStorage). Network first: whenever the node answers, its files are used and the copy
// is refreshed. Only GETs of the app's files are handled here, never the JSON-RPC calls.
'use strict';

const CACHE = 'kubelt-notes-1';
const FILES = ['./', 'index.html', 'app.js', 'style.css'];

self.addEventListener('install', (event) => {
  event.waitUntil(
    caches
      .open(CACHE)
      .then((cache) => cache.addAll(FILES))
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener('activate', (event) => {
  event.waitUntil(self.clients.claim());
});

self.addEventListener('fetch', (event) => {
  const request = event.request;
  if (request.method !== 'GET' || !request.url.startsWith(self.registration.scope)) return;
  event.respondWith(
    fetch(request)
      .then((response) => {
        if (response.ok) {
          const copy = response.clone();
          event.waitUntil(caches.open(CACHE).then((cache) => cache.put(request, copy)));
        }
        return response;
      })
      .catch(() => caches.match(request).then((cached) => cached || Response.error())),
  );
});
