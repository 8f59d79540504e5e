"""The seed's basic Python examples (mpi4casa, section 5.7), ex 1-12, run
unchanged but for the import:

    casa-node run --servers 3 examples/seed_examples.py

The seed's three servers were numbered 0, 1 and 2. In casa-node rank 0 is
the head node and the servers are ranks 1, 2 and 3, so the seed's
target `[0]` is `[servers[0]]` here. Each example prints the response
records with the keys the seed shows (casa-node's records also carry
`command_start_time` and `command_stop_time`)."""

from pprint import pprint

from casanode import MPICommandClient, MPIEnvironment

SEED_KEYS = ("command", "id", "mode", "parameters", "ret", "server", "status", "successful", "traceback")

client = MPICommandClient()
client.start_services()
servers = MPIEnvironment.mpi_server_rank_list()
first, second = servers[0], servers[1]


def show(number, title, command_response_list):
    print(f"ex {number}: {title}")
    pprint([{key: response[key] for key in SEED_KEYS} for response in command_response_list])


def non_blocking(command, target, parameters=None):
    command_request_id_list = client.push_command_request(command, False, target, parameters)
    # Try to get responses before time in non-blocking mode
    client.get_command_response(command_request_id_list, False, True)
    # Get response in blocking mode
    return client.get_command_response(command_request_id_list, True, True)


show(1, "Blocking mode, string parameters, undefined target server",
     client.push_command_request("1+1", True, None))
show(2, "Blocking mode, string parameters, defined target server",
     client.push_command_request("1+1", True, [first]))
show(3, "Blocking mode, string parameters, multiple target server",
     client.push_command_request("1+1", True, [first, second]))
show(4, "Non-Blocking mode, string parameters, undefined target server",
     non_blocking("1+1", None))
show(5, "Non-Blocking mode, string parameters, defined target server",
     non_blocking("1+1", [first]))
show(6, "Non-Blocking mode, string parameters, multiple target servers",
     non_blocking("1+1", [first, second]))
show(7, "Blocking mode, dictionary parameters, undefined target server",
     client.push_command_request("a+b", True, None, {"a": 1, "b": 2}))
show(8, "Blocking mode, dictionary parameters, defined target server",
     client.push_command_request("a+b", True, [first], {'a': 1, 'b': 2}))
show(9, "Blocking mode, dictionary parameters, multiple target server",
     client.push_command_request("a+b", True, [first, second], {'a': 1, 'b': 2}))
show(10, "Non-Blocking mode, dictionary parameters, undefined target server",
     non_blocking("a+b", None, {'a': 1, 'b': 2}))
show(11, "Non-Blocking mode, dictionary parameters, defined target server",
     non_blocking("a+b", [first], {'a': 1, 'b': 2}))
show(12, "Non-Blocking mode, dictionary parameters, multiple target server",
     non_blocking("a+b", [first, second], {'a': 1, 'b': 2}))
