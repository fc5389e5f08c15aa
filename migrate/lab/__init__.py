"""The lab: two emulated hosts on one machine, joined by a shaped link.

Two network namespaces (`mlab-NAME-src`, `mlab-NAME-dst`) joined by a veth
pair, each end shaped with tc tbf (rate), nftables (loss, and the redirect
into our delay relay), a source agent in one and a destination agent in the
other. A *keeper* process owns it all; a *janitor* tears it down when the
keeper ends, however it ends. See docs/lab.md.
"""
