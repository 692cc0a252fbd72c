from downstream_adapters.evaluate.cli import main

raise SystemExit(main())
