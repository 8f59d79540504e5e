"""examples/seed_examples.py, the port of the seed's section 5.7, gives the
response records the seed shows: the same ids, modes, `ret`, `status`,
`successful` and `traceback`, on the servers the seed's targets name."""

import ast
import re

import clusters

# The seed's records, ex 1-12: (command, parameters, [(id, seed server)]).
# Seed servers are 0, 1, 2; None where the seed gave no target (any server).
SEED = {
    1: ("1+1", None, [(1, None)]),
    2: ("1+1", None, [(2, 0)]),
    3: ("1+1", None, [(3, 0), (4, 1)]),
    4: ("1+1", None, [(5, None)]),
    5: ("1+1", None, [(6, 0)]),
    6: ("1+1", None, [(7, 0), (8, 1)]),
    7: ("a+b", {"a": 1, "b": 2}, [(9, None)]),
    8: ("a+b", {"a": 1, "b": 2}, [(10, 0)]),
    9: ("a+b", {"a": 1, "b": 2}, [(11, 0), (12, 1)]),
    10: ("a+b", {"a": 1, "b": 2}, [(13, None)]),
    11: ("a+b", {"a": 1, "b": 2}, [(14, 0)]),
    12: ("a+b", {"a": 1, "b": 2}, [(15, 0), (16, 1)]),
}
RET = {"1+1": 2, "a+b": 3}


def printed_examples(stdout):
    """{number: records} from the script's output."""
    blocks = re.split(r"^ex (\d+): .*$", stdout, flags=re.M)
    assert blocks[0].strip() == "", blocks[0]
    return {int(n): ast.literal_eval(text) for n, text in zip(blocks[1::2], blocks[2::2])}


def test_the_seed_examples_give_the_seed_records(repo, tmp_path, transport):
    done = clusters.run(repo / "examples" / "seed_examples.py", servers=3,
                        transport=transport, directory=tmp_path)
    assert done.returncode == 0, done.stderr
    examples = printed_examples(done.stdout)
    assert sorted(examples) == list(SEED)
    ranks = [1, 2, 3]
    for number, (command, parameters, expected) in SEED.items():
        records = examples[number]
        assert len(records) == len(expected), (number, records)
        for record, (rid, seed_server) in zip(records, expected):
            assert record == {
                "command": command,
                "id": rid,
                "mode": "eval",
                "parameters": parameters,
                "ret": RET[command],
                "server": record["server"] if seed_server is None else ranks[seed_server],
                "status": "response received",
                "successful": True,
                "traceback": None,
            }, number
            assert record["server"] in ranks
