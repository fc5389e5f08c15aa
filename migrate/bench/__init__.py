"""`migrate bench`: run a matrix of migrations, each cell against an unmigrated baseline."""
