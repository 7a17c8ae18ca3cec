//! ballast-replica: being built.
