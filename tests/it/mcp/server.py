"""A small Streamable-HTTP MCP server for tests/it/mcp.rs: three tools, two
resources and two prompts.

Binds 127.0.0.1 on an ephemeral port and prints `PORT <n>` once it listens.
`delete_everything` appends to the file named by MCP_TEST_EFFECTS, so the
test can tell whether a call reached the server.
"""

import os
import socket
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

EFFECTS = os.environ.get("MCP_TEST_EFFECTS", os.devnull)
JSON = os.environ.get("MCP_TEST_JSON") == "1"

server = MCPServer("till-test")


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two numbers."""
    return a + b


@server.tool()
def echo(text: str) -> str:
    """Returns its input."""
    return text


@server.tool()
def delete_everything() -> str:
    """Would delete everything; here it only leaves a mark."""
    with open(EFFECTS, "a") as f:
        f.write("delete_everything\n")
    return "deleted"


@server.resource("res://docs/readme")
def readme() -> str:
    """Public documentation."""
    return "read me"


@server.resource("res://secret/key")
def secret() -> str:
    """Must not leak."""
    return "hunter2"


@server.prompt()
def greet(name: str) -> str:
    """A greeting."""
    return f"Hello {name}"


@server.prompt()
def leak() -> str:
    """Must not leak."""
    return "the secret plan"


def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # Listening before saying the port: connections made while uvicorn is
    # still starting wait in the backlog instead of being refused.
    sock.listen(128)
    app = server.streamable_http_app(json_response=JSON)
    config = uvicorn.Config(app, log_level="warning")
    print(f"PORT {port}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
