"""Research studies: what the system is worth (headroom, ceilings, refresh, public sequential data)."""
