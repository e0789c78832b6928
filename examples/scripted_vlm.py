"""A scripted stand-in for a VLM server: the OpenAI chat-completions protocol, answered by a rule, not a model.

For the offline demo, the tests and the benchmarks of --reward vlm / vlm-rating (rewards/vlm.py):

    python examples/scripted_vlm.py --port 8000 &                 # prefers the brighter image
    python drpo.py --model tiny --reward vlm --reward-url http://127.0.0.1:8000/v1 --reward-model scripted \\
        --max-steps 100 --lr 1e-3 --grad-accum 1

A pairwise question (two images) is answered {"winner": "A"} when the first image is the brighter (mean pixel),
"B" when the second is, "tie" when equal; a rating question (one image) {"score": 10 x brightness}. Flags script a
bad server: a fixed answer for every question (--answer '{"winner": "A"}' is pure position bias), invalid answers
first, 503s first or after a number of requests, added latency. GET /stats gives the requests answered, the most in flight at once and the
Authorization header last received (so a test can check the key was sent).
"""
import argparse
import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def brightness(url):
    from PIL import Image
    import numpy as np

    data = base64.b64decode(url.split(",", 1)[1])
    return float(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64).mean() / 255)


def rule(content):
    """The answer to one user message's content (image_url items, then text)."""
    values = [brightness(item["image_url"]["url"]) for item in content if item.get("type") == "image_url"]
    if len(values) == 1:
        return json.dumps({"score": round(10 * values[0], 4), "reason": "scripted: brightness"})
    a, b = values
    return json.dumps({"winner": "A" if a > b else "B" if b > a else "tie", "confidence": 1.0, "reason": "scripted"})


def make_server(port, answer=None, invalid_first=0, fail_first=0, latency=0.0, fail_after=None, host="127.0.0.1"):
    """The server on host:port (0: a free port the OS picks, then server.server_address[1]); server.state: /stats."""
    state = {"requests": 0, "in_flight": 0, "max_in_flight": 0, "authorization": None}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            with lock:
                self.reply(200, dict(state)) if self.path == "/stats" else self.reply(404, {"error": "not found"})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                state["requests"] += 1
                n, state["authorization"] = state["requests"], self.headers.get("Authorization")
                state["in_flight"] += 1
                state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
            try:  # in flight until the answer is ready: a client that has it may send its next request at once
                time.sleep(latency)
                if n <= fail_first or fail_after is not None and n > fail_after:
                    status, answer_body = 503, {"error": {"message": "scripted: busy", "type": "server_error"}}
                else:
                    text = ("not json" if n <= fail_first + invalid_first else
                            answer if answer is not None else rule(request["messages"][-1]["content"]))
                    status, answer_body = 200, {
                        "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                        "model": request["model"], "choices": [{"index": 0, "finish_reason": "stop", "message":
                                                                {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            finally:
                with lock:
                    state["in_flight"] -= 1
            self.reply(status, answer_body)

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # the default backlog, 5, makes a 6th client connecting at once wait a second

    server = Server((host, port), Handler)
    server.state = state
    return server


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1")
    p.add_argument("--answer", help="answer every question with this text instead of the brightness rule")
    p.add_argument("--invalid-first", type=int, default=0, help="answer the first N questions with invalid text")
    p.add_argument("--fail-first", type=int, default=0, help="answer the first N requests with HTTP 503")
    p.add_argument("--fail-after", type=int, help="answer every request after the N-th with HTTP 503 (a server that "
                   "goes down)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    a = p.parse_args()
    make_server(a.port, a.answer, a.invalid_first, a.fail_first, a.latency, a.fail_after).serve_forever()


if __name__ == "__main__":
    main()
