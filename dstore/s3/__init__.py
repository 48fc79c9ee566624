"""The S3-compatible API (SPEC section 6): AWS Signature Version 4 (``sigv4``), and, to
come, the listener, its XML and its handlers over the gateway's pipelines."""
