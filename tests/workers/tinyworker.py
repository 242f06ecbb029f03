"""The lightest worker for scale tests: standard library only, starts in ~20 ms (run -I -S).

Serves every inherited socket (LISTEN_FDS from fd 3): TCP answers one HTTP/1.0 request per
connection with "slot pid gen"; UDP answers each datagram with "slot pid gen". SIGTERM stops
it between two accepts (flag + wakeup fd + select before accept), losing nothing.
"""

import os
import selectors
import signal
import socket


def main() -> None:
    count = int(os.environ.get("LISTEN_FDS", "0"))
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or count < 1:
        raise SystemExit("tinyworker: no inherited sockets (run under portshard run)")
    body = f"{os.environ.get('PORTSHARD_SLOT', '?')} {os.getpid()} {os.environ.get('GEN', '1')}"
    reply = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body) + 1}\r\n\r\n{body}\n".encode()
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    signal.set_wakeup_fd(w.fileno())
    stop = []
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.append(1))
    sel = selectors.DefaultSelector()
    sel.register(r, selectors.EVENT_READ)
    for fd in range(3, 3 + count):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
    while not stop:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is r:
                r.recv(64)
            elif sock.type == socket.SOCK_DGRAM:
                try:
                    _, peer = sock.recvfrom(2048)
                except BlockingIOError:
                    continue
                sock.sendto(body.encode(), peer)
            else:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
                with conn:
                    conn.setblocking(True)
                    conn.settimeout(5)
                    try:
                        conn.recv(4096)
                        conn.sendall(reply)
                    except OSError:
                        pass


if __name__ == "__main__":
    main()
