"""The benchmark behind `make bench` (see bench/README.md): mailer against its protocol and queue ceilings."""
