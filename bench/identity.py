"""Before measuring: the baseline must answer exactly as the service does.

A ratio against a server that reads fewer columns, formats etags otherwise
or skips a field would flatter or insult the service. So for the same rows
both servers' answers are compared byte for byte: GetUser and LookupUser
directly; CreateUser and UpdateUser by writing through one server and
reading the row back through the other (same row, same etag).
"""

from bench.load import call_raw
from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb

USER_SERVICE = "/pat.users.v1.UserService"


def _call(address: str, method: str, request: object, response_type: type) -> object:
    raw = call_raw(address, f"{USER_SERVICE}/{method}", request.SerializeToString())  # type: ignore[attr-defined]
    return response_type.FromString(raw)  # type: ignore[attr-defined]


def _user_bytes(address: str, method: str, request: object, response_type: type) -> bytes:
    response = _call(address, method, request, response_type)
    return bytes(response.user.SerializeToString(deterministic=True))  # type: ignore[attr-defined]


def mismatches(service: str, baseline: str, user_id: str) -> list[str]:
    """What differs between the two servers' answers (empty: nothing).

    Writes go to `user_id` and to new users named identity-*@example.com.
    """
    found = []
    email = _call(service, "GetUser", pb.GetUserRequest(id=user_id), pb.GetUserResponse).user.email  # type: ignore[attr-defined]
    get = pb.GetUserRequest(id=user_id)
    if call_raw(service, f"{USER_SERVICE}/GetUser", get.SerializeToString()) != call_raw(
        baseline, f"{USER_SERVICE}/GetUser", get.SerializeToString()
    ):
        found.append("GetUser answers differ")
    lookup = pb.LookupUserRequest(email=email)
    if _user_bytes(service, "LookupUser", lookup, pb.LookupUserResponse) != _user_bytes(
        baseline, "LookupUser", lookup, pb.LookupUserResponse
    ):
        found.append("LookupUser answers differ")
    for writer, reader in ((baseline, service), (service, baseline)):
        found += _write_then_read(writer, reader, user_id, writer.rsplit(":", 1)[1])
    return found


def _write_then_read(writer: str, reader: str, user_id: str, tag: str) -> list[str]:
    found = []
    create = pb.CreateUserRequest(user=user_pb2.User(email=f"identity-{tag}@example.com"))
    created = _call(writer, "CreateUser", create, pb.CreateUserResponse).user  # type: ignore[attr-defined]
    if created.SerializeToString(deterministic=True) != _read_back(reader, created.id):
        found.append(f"CreateUser through {writer}: {reader} reads another user")
    update = pb.UpdateUserRequest(user=user_pb2.User(id=user_id, display_name=f"identity {tag}"))
    updated = _call(writer, "UpdateUser", update, pb.UpdateUserResponse).user  # type: ignore[attr-defined]
    if updated.SerializeToString(deterministic=True) != _read_back(reader, user_id):
        found.append(f"UpdateUser through {writer}: {reader} reads another user")
    return found


def _read_back(address: str, user_id: str) -> bytes:
    return _user_bytes(address, "GetUser", pb.GetUserRequest(id=user_id), pb.GetUserResponse)
