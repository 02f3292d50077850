"""The official MCP client (the `mcp` package) driven line by line, for
tests/it/mcp.rs.

Usage: client.py URL TOKEN MODE, MODE being `legacy` (initialize, sessions,
event streams) or `auto` (the newest protocol). Reads commands on stdin and
answers each with one JSON line on stdout, all in one MCP session:

    list                  -> {"tools": [names]}
    call NAME JSON-ARGS   -> {"ok": text} or {"error": {"code", "message", "data"}}
    resources             -> {"resources": [uris]}
    read URI              -> {"ok": text} or {"error": ...}
    prompts               -> {"prompts": [names]}
    prompt NAME JSON-ARGS -> {"ok": text} or {"error": ...}
    quit
"""

import asyncio
import json
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


def say(obj) -> None:
    print(json.dumps(obj), flush=True)


async def main(url: str, token: str, mode: str) -> None:
    # The Till token is the bearer credential; the MCP server never sees it.
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)
    async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        say({"ready": client.protocol_version})
        loop = asyncio.get_running_loop()
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if not line or line == "quit":
                break
            cmd, _, rest = line.partition(" ")
            try:
                if cmd == "list":
                    result = await client.list_tools()
                    say({"tools": [t.name for t in result.tools]})
                elif cmd == "call":
                    name, _, args = rest.partition(" ")
                    result = await client.call_tool(name, json.loads(args or "{}"))
                    if result.is_error:
                        say({"tool_error": [c.text for c in result.content]})
                    else:
                        say({"ok": [c.text for c in result.content]})
                elif cmd == "resources":
                    result = await client.list_resources()
                    say({"resources": [str(r.uri) for r in result.resources]})
                elif cmd == "read":
                    result = await client.read_resource(rest)
                    say({"ok": [c.text for c in result.contents]})
                elif cmd == "prompts":
                    result = await client.list_prompts()
                    say({"prompts": [p.name for p in result.prompts]})
                elif cmd == "prompt":
                    name, _, args = rest.partition(" ")
                    result = await client.get_prompt(name, json.loads(args or "{}"))
                    say({"ok": [m.content.text for m in result.messages]})
                else:
                    say({"unknown": cmd})
            except MCPError as e:
                say({"error": {"code": e.code, "message": e.message, "data": e.data}})
            except Exception as e:  # anything else is a test failure to show
                say({"exception": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
