"""pat-users: the gRPC server behind pat.users.v1.UserService."""
