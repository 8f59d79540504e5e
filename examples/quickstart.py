"""casa-node in a few lines: run with `scripts/quickstart.sh`, or
`casa-node run --servers 2 examples/quickstart.py` under a Python that has
protobuf."""

from casanode import MPICommandClient, MPIEnvironment

client = MPICommandClient()
client.start_services()
print("servers:", MPIEnvironment.mpi_server_rank_list())

# Blocking push with parameters, to server 1: a list of response records.
[response] = client.push_command_request("a+b", True, [1], {"a": 1, "b": 2})
print("a+b on server", response["server"], "->", response["ret"], f"({response['status']})")

# Parameters in the string, to every server.
for r in client.push_command_request("import os; pid = os.getpid()", True, [1, 2]):
    print("exec on server", r["server"], "->", r["mode"], r["successful"])

# Globals persist on each server.
print("pids:", [r["ret"] for r in client.push_command_request("pid", True, [1, 2])])

# An error comes back with its traceback.
[failed] = client.push_command_request("1/0", True)
print("1/0 successful:", failed["successful"])
print(failed["traceback"].strip().splitlines()[-1])

# Non-blocking: ids at once, responses later.
ids = client.push_command_request("(time.sleep(0.2), 'slept')[1]", False, [1, 2])
print("ids:", ids)
print("now:", [r["status"] for r in client.get_command_response(ids, block=False, verbose=False)])
print("later:", [r["ret"] for r in client.get_command_response(ids, block=True)])

# The server table.
for rank, status in sorted(client.get_server_status().items()):
    print("server", rank, "online" if status["online"] else "offline", "busy" if status["busy"] else "idle")

client.stop_services()
