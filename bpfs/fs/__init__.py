"""The FUSE adapter: the only package that imports pyfuse3 (ops, tree tables, inodes, mount)."""
