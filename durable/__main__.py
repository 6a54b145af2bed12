from __future__ import annotations

from durable._cli import main

raise SystemExit(main())
