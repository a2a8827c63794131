"""Retrieval: parse documents, chunk them, embed the chunks, store them in pgvector, search, and
assemble a cited context. Every function takes its connection and embedder explicitly; importing this
package loads no model and opens no connection."""
