"""datapipes."""
