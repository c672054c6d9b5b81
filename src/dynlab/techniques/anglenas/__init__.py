"""AngleNAS (Hu et al., "Angle-based Search Space Shrinking for Neural Architecture Search", ECCV
2020): a supernet whose lowest-angle operators are dropped while it trains, then SPOS's search on
the shrunk space."""
