"""Finding a cluster: the endpoint given, $CASA_NODE_ENDPOINT, the
connection file, or the record `casa-node up` left in the runtime
directory (skipping, and removing, records of head nodes that are gone)."""

import json
import os
import stat

from .errors import CasaNodeError, NoCluster, Refused

ENDPOINT_VAR = "CASA_NODE_ENDPOINT"
CONNECTION_FILE_VAR = "CASA_NODE_CONNECTION_FILE"


def runtime_dir():
    """Where `casa-node up` keeps its sockets and endpoint record:
    $XDG_RUNTIME_DIR/casa-node, else $TMPDIR (or /tmp)/casa-node-UID."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "casa-node")
    return os.path.join(os.environ.get("TMPDIR") or "/tmp", f"casa-node-{os.getuid()}")


def _recorded_or_fail():
    """What `_recorded` returns, or NoCluster saying how to start one."""
    record = _recorded()
    if record is None:
        raise NoCluster(
            "no casa-node cluster found: start one with `casa-node up`, "
            f"or pass an endpoint or set {ENDPOINT_VAR}"
        )
    return record


def _recorded():
    """(endpoint, connection file or None) that `casa-node up` recorded,
    or None. A record whose process (its `pid N` line) is gone is stale,
    and taken as none; `casa-node` removes such records when it meets them."""
    record = os.path.join(runtime_dir(), "endpoint")
    try:
        with open(record, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return None
    if not lines:
        return None
    connection_file = None
    for line in lines[1:]:
        if line.startswith("pid "):
            if not _alive(line[len("pid "):]):
                return None
        else:
            connection_file = line
    return lines[0], connection_file


def _alive(pid):
    try:
        pid = int(pid)
    except ValueError:
        return True
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_connection_file(path):
    """The connection file of a tcp:// front door, as a dict with
    "endpoint", "token" and "cert" (and, in the node's copy, "key" and
    "signing_key"). Refused unless it is this user's and closed to group
    and others, since it holds secrets."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.getuid():
                raise CasaNodeError(
                    f"connection file {path}: belongs to uid {st.st_uid}, not to this user "
                    f"(uid {os.getuid()}); a connection file holds secrets and must be its user's own"
                )
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise CasaNodeError(
                    f"connection file {path}: group or others may access it (mode {mode:03o}); "
                    f"it holds secrets: make it 0600 (`chmod 600 {path}`)"
                )
            data = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise CasaNodeError(f"connection file {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise CasaNodeError(f"connection file {path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CasaNodeError(f"connection file {path}: not a JSON object")
    for field in ("endpoint", "token", "cert"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise CasaNodeError(f"connection file {path}: no {field!r}")
    if not data["endpoint"].startswith("tcp://"):
        raise CasaNodeError(f"connection file {path}: {data['endpoint']!r} is not tcp://HOST:PORT")
    return data


def split_endpoint(endpoint):
    """("unix", PATH) or ("tcp", (HOST, PORT)) for an endpoint string."""
    endpoint = os.fspath(endpoint)
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
        if path:
            return "unix", path
    elif endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host and port.isdigit() and int(port) < 65536:
            return "tcp", (host, int(port))
    elif "://" not in endpoint and endpoint:
        return "unix", endpoint
    raise CasaNodeError(f"invalid endpoint {endpoint!r}: expected unix://PATH or tcp://HOST:PORT")


def resolve(endpoint=None, connection_file=None):
    """(endpoint, connection file dict or None) of the front door to use.

    The endpoint: `endpoint`, else $CASA_NODE_ENDPOINT, else the connection
    file's, else the one `casa-node up` recorded. A tcp:// front door's
    connection file: `connection_file`, else $CASA_NODE_CONNECTION_FILE,
    else the one `up` recorded with that endpoint."""
    if not connection_file:
        connection_file = os.environ.get(CONNECTION_FILE_VAR) or None
    if not endpoint:
        endpoint = os.environ.get(ENDPOINT_VAR)
    conf = None
    if not endpoint and connection_file:
        conf = read_connection_file(connection_file)
        endpoint = conf["endpoint"]
    recorded_file = None
    if not endpoint:
        endpoint, recorded_file = _recorded_or_fail()
    endpoint = os.fspath(endpoint)
    kind, _ = split_endpoint(endpoint)
    if kind == "unix":
        return endpoint, None
    if conf is None:
        if not connection_file:
            record = _recorded()
            if record is not None and record[0] == endpoint:
                recorded_file = record[1]
            connection_file = recorded_file
        if not connection_file:
            raise CasaNodeError(
                f"{endpoint}: a tcp:// front door needs its connection file: "
                f"pass connection_file or set {CONNECTION_FILE_VAR}"
            )
        conf = read_connection_file(connection_file)
    return endpoint, conf


def resolve_endpoint(endpoint=None):
    """The front door to use: `endpoint` (unix://PATH, a path, or
    tcp://HOST:PORT), else $CASA_NODE_ENDPOINT, else the record left by
    `casa-node up`. Returns a unix:// front door's socket path, or a
    tcp:// endpoint as it is."""
    if not endpoint:
        endpoint = os.environ.get(ENDPOINT_VAR)
    if not endpoint:
        endpoint = _recorded_or_fail()[0]
    endpoint = os.fspath(endpoint)
    kind, address = split_endpoint(endpoint)
    return address if kind == "unix" else endpoint
