// A Go HTTP server that binds its own port, as in the Go socket-sharding article, built by the
// tests with CGO_ENABLED=0: its net package makes raw system calls, so only `--via seccomp`
// can hand it the supervisor's socket. Usage: hello PORT.
package main

import (
	"fmt"
	"log"
	"net/http"
	"os"
)

func main() {
	if len(os.Args) != 2 {
		log.Fatal("usage: hello PORT")
	}
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "Hello from PID %d\n", os.Getpid())
	})
	log.Fatal(http.ListenAndServe(":"+os.Args[1], nil))
}
