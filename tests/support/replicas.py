"""Read replicas in tests: the README's interceptor, and waiting for a standby."""

import re

from tests.support.timing import eventually
from toolkit import PROJECT_ROOT
from toolkit.standby import Standby


def readme_interceptor() -> type:
    """The README's ReadYourWrites client interceptor class, as written there."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", readme, re.DOTALL | re.MULTILINE)
    (block,) = [b for b in blocks if "class ReadYourWrites" in b]
    # Its example channel is never used: aimed at the discard port, it is never opened.
    code = block.replace('"pat-users:50051"', '"127.0.0.1:9"')
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    return namespace["ReadYourWrites"]  # type: ignore[return-value]


async def replayed(standby: Standby) -> None:
    """Until `standby` shows everything the primary had written when asked."""
    await eventually(standby.caught_up, True, within=30)
