from bench.app.cli import main

raise SystemExit(main())
