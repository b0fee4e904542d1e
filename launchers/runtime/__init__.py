"""What the stages share: process groups, config and flags, run folders, finiteness, fault points,
scoring and evaluation helpers."""
