// A node `http` server that binds its own port (node PORT): "Hello from PID N".
"use strict";
const http = require("http");
const port = Number(process.argv[2]);
http
  .createServer((req, res) => {
    res.writeHead(200, { "Content-Type": "text/plain" });
    res.end(`Hello from PID ${process.pid}\n`);
  })
  .listen(port);
