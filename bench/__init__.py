"""`make bench`: the suite measured against the ceilings of the parts it is built from."""
