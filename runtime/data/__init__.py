"""Real data sets that ship in Debian packages, prepared into one tensor format per modality."""
