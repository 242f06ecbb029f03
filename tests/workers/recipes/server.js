// The node recipe: binds its own port (node server.js PORT) and stops gracefully on SIGTERM:
// server.close() stops accepting and waits for the requests in hand, then a marker is written.
"use strict";
const fs = require("fs");
const http = require("http");
const path = require("path");
const port = Number(process.argv[2]);
const server = http.createServer((req, res) => {
  res.writeHead(200, { "Content-Type": "text/plain", Connection: "close" });
  res.end(`pid ${process.pid}\n`);
});
server.listen(port);
process.on("SIGTERM", () => {
  server.close(() => {
    if (process.env.PS_MARKERS) {
      fs.writeFileSync(path.join(process.env.PS_MARKERS, `shutdown.${process.pid}`), "");
    }
    process.exit(0);
  });
  server.closeIdleConnections();
});
