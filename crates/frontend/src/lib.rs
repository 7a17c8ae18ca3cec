//! ballast-frontend: being built.
