// A node `cluster` pre-fork server (the README's recipe): the primary forks CHILDREN workers
// (default 2) that listen(port); the primary binds (under the preload shim: the slot's socket)
// and hands connections round-robin. On SIGTERM the primary disconnects its workers (each
// closes its server and exits once its connections end) and exits 0.
"use strict";
const cluster = require("cluster");
const http = require("http");
const port = Number(process.argv[2]);
const children = Number(process.env.CHILDREN || 2);
if (cluster.isPrimary) {
  for (let i = 0; i < children; i++) cluster.fork();
  process.on("SIGTERM", () => cluster.disconnect(() => process.exit(0)));
} else {
  http
    .createServer((req, res) => {
      res.writeHead(200, { "Content-Type": "text/plain", Connection: "close" });
      res.end(`pid ${process.pid}\n`);
    })
    .listen(port);
}
