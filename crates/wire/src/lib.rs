//! ballast-wire: being built.
