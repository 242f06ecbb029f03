// The Go recipe: binds its own port (server PORT, or server HOST:PORT; built with
// CGO_ENABLED=0, so portshard's seccomp trap hands it the slot's socket) and stops gracefully on SIGTERM: Shutdown() stops
// accepting and waits for the requests in hand, then a marker is written.
package main

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) != 2 {
		log.Fatal("usage: server PORT | HOST:PORT")
	}
	addr := os.Args[1]
	if !strings.Contains(addr, ":") {
		addr = ":" + addr
	}
	srv := &http.Server{Addr: addr, Handler: http.HandlerFunc(
		func(w http.ResponseWriter, r *http.Request) { fmt.Fprintf(w, "pid %d\n", os.Getpid()) })}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- srv.ListenAndServe() }()
	select {
	case err := <-done:
		log.Fatal(err)
	case <-stop:
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Fatal(err)
	}
	if dir := os.Getenv("PS_MARKERS"); dir != "" {
		if f, err := os.Create(filepath.Join(dir, fmt.Sprintf("shutdown.%d", os.Getpid()))); err == nil {
			f.Close()
		}
	}
}
