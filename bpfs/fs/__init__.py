"""The FUSE adapter: the only package that imports pyfuse3 (ops, tree tables, inodes, procfs,
mount). docs/architecture.md places it among the layers."""
