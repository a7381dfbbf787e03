"""What every test suite here shares: ports and waits (``net``), a control-socket client
(``control``), the real service process and client processes (``service``), Chromium
(``browser``) and test certificates (``certs``)."""
