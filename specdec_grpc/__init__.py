"""gRPC plumbing shared by every specdec service: status mapping, server set-up, conversions."""
