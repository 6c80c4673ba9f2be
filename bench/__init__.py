"""Load benchmark for pat-users: `make bench`."""
