from infermesh.cli import main

raise SystemExit(main())
