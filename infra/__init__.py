"""Operations: local S3 server, cluster submission, manifests. The core never imports this."""
