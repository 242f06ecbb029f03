"""A multi-host test bed on one machine: hosts behind HAProxy and nftables, in network
namespaces (issue 16). `bed.Bed` builds it; ``python -m bench.netbed`` (``make netbed``) runs
the scenarios and the balancer benchmark; tests/integration/test_netbed.py is its reduced form."""
