//! ballast-chunkstore: being built.
