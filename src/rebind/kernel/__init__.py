"""I/O adapters: netlink sock_diag, /proc owners and fallbacks, sysctl, trial bind, SOCK_DESTROY."""
