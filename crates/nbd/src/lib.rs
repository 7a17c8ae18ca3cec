//! ballast-nbd: being built.
