"""The pyzmq peer of L3: a DEALER in this process and a ROUTER in a second
Python process, over ipc:// in a private temporary directory. The DEALER
sends a small pickled request dict ({"command": "1+1", ...}), the ROUTER
`eval`s its command and sends a small pickled response dict back.

    zmq_pingpong.py REQUESTS WARMUP

prints one JSON line: the median round trip of REQUESTS after WARMUP."""

import json
import pickle
import subprocess
import sys
import tempfile
import time

import zmq


def serve(address):
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(address)
    while True:
        identity, payload = router.recv_multipart()
        request = pickle.loads(payload)
        if request is None:
            break
        ret = eval(request["command"])
        router.send_multipart([identity, pickle.dumps(
            {"id": request["id"], "ret": ret, "successful": True,
             "status": "response received", "server": 1})])
    router.close(linger=0)
    context.term()


def main(requests, warmup):
    with tempfile.TemporaryDirectory(prefix="zmqpp-") as directory:
        address = f"ipc://{directory}/pingpong.sock"
        server = subprocess.Popen([sys.executable, __file__, "serve", address])
        try:
            context = zmq.Context()
            dealer = context.socket(zmq.DEALER)
            dealer.connect(address)  # queued until the ROUTER binds
            times = []
            for i in range(warmup + requests):
                began = time.perf_counter()
                dealer.send(pickle.dumps({"id": i, "command": "1+1", "parameters": None, "target": 1}))
                response = pickle.loads(dealer.recv())
                elapsed = time.perf_counter() - began
                if response["ret"] != 2 or response["id"] != i:
                    raise SystemExit(f"unexpected response {response!r}")
                if i >= warmup:
                    times.append(elapsed)
            dealer.send(pickle.dumps(None))
            server.wait(30)
            dealer.close(linger=0)
            context.term()
        finally:
            if server.poll() is None:  # by PID, the process started above
                server.kill()
                server.wait()
    times.sort()
    print(json.dumps({
        "median_us": times[len(times) // 2] * 1e6,
        "min_us": times[0] * 1e6,
        "p99_us": times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6,
        "requests": requests,
    }), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        main(int(sys.argv[1]), int(sys.argv[2]))
