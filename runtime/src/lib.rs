//! Runtime for exported Carrot graphs.
