"""Tiers: tier maps, their resolution against the machine, allocation on a tier, placement checks."""
