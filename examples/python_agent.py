#!/usr/bin/env python3
"""Hand a sub-agent a narrower Till token, then call the model through Till.

The parent token comes from TILL_TOKEN (an operator ran `till issue ...`).
This script appends one attenuation block with biscuit-python -- no private
key and no server involved -- that limits the child to:

  * the openai service and the path prefix /v1/chat/completions,
  * SUB_AGENT_USES uses (default 5) of the new block,
  * an expiry SUB_AGENT_TTL_MINUTES from now (default 10).

Every use of the child also counts against every limit of the parent, so a
sub-agent can never spend more than its parent has left.

If the OpenAI Python SDK is installed, the script then makes one chat
completion through the proxy with the child token. Otherwise it prints the
child token so you can use it elsewhere.

Environment:
  TILL_TOKEN       the parent token (required)
  TILL_PUBLIC_KEY  the root public key, "ed25519/<hex>", from `till pubkey`
                   (required: biscuit-python 0.4 can only serialise a token
                   after checking its signatures; the key is not secret)
  TILL_URL         the proxy, default http://127.0.0.1:8787
  MODEL            model for the demo request, default gpt-4o-mini

Requires: pip install biscuit-python   (optional: pip install openai)
"""

import datetime
import os
import sys

from biscuit_auth import BlockBuilder, PublicKey, UnverifiedBiscuit


def attenuate(parent: str, public_key: str, uses: int, ttl: datetime.timedelta) -> str:
    """Returns the parent token with one more block appended."""
    token = UnverifiedBiscuit.from_base64(parent)
    # The new block's index is the parent's block count. The use limit must
    # name that index: the proxy supplies uses(k, n) for every block k.
    k = token.block_count()
    expires = datetime.datetime.now(datetime.timezone.utc) + ttl
    block = BlockBuilder(
        """
        label({label});
        check if service($s), {"openai"}.contains($s);
        check if path($p), $p.starts_with({prefix});
        check if time($t), $t <= {expires};
        use_limit({k}, {n});
        check if uses({k}, $u), $u <= {n};
        """,
        {
            "label": "python sub-agent",
            "prefix": "/v1/chat/completions",
            "expires": expires,
            "k": k,
            "n": uses,
        },
    )
    child = token.append(block)
    # biscuit-python 0.4 has no to_base64() on UnverifiedBiscuit: check the
    # signatures with the root public key to get a Biscuit we can serialise.
    return child.verify(PublicKey(public_key)).to_base64()


def main() -> int:
    parent = os.environ.get("TILL_TOKEN", "").strip()
    public_key = os.environ.get("TILL_PUBLIC_KEY", "").strip()
    if not parent or not public_key:
        print(
            "set TILL_TOKEN to a Till token and TILL_PUBLIC_KEY to the output of `till pubkey`",
            file=sys.stderr,
        )
        return 2
    uses = int(os.environ.get("SUB_AGENT_USES", "5"))
    ttl = datetime.timedelta(minutes=int(os.environ.get("SUB_AGENT_TTL_MINUTES", "10")))
    try:
        child = attenuate(parent, public_key, uses, ttl)
    except Exception as e:  # bad token, bad key, or a key that did not sign the token
        print(f"cannot attenuate: {e!r} (is TILL_PUBLIC_KEY the output of `till pubkey`?)", file=sys.stderr)
        return 2

    try:
        from openai import OpenAI
    except ImportError:
        print("openai is not installed; here is the sub-agent's token:", file=sys.stderr)
        print(child)
        return 0

    base = os.environ.get("TILL_URL", "http://127.0.0.1:8787").rstrip("/")
    # The child token goes where the OpenAI key would; Till checks it,
    # counts the use, and injects the real key upstream.
    client = OpenAI(base_url=f"{base}/openai/v1", api_key=child, max_retries=0)
    try:
        reply = client.chat.completions.create(
            model=os.environ.get("MODEL", "gpt-4o-mini"),
            messages=[{"role": "user", "content": "Say hello in five words."}],
        )
    except Exception as e:  # openai.APIStatusError carries Till's error code
        print(f"request refused: {e}", file=sys.stderr)
        return 1
    print(reply.choices[0].message.content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
