"""A private RabbitMQ node: its files, its processes, and a service that supervises it.

* :mod:`~funcx_endpoint.rabbitmq.node`: the node's directory, identity
  (name, ports, admin credentials in ``node.json``), ``rabbitmq.conf`` and
  the environments its programs run with;
* :mod:`~funcx_endpoint.rabbitmq.processes`: the programs and their command
  lines, and finding a node's processes by their marker;
* :mod:`~funcx_endpoint.rabbitmq.commands`: short helper commands
  (``rabbitmqctl``, ``epmd -names``) on the reactor;
* :mod:`~funcx_endpoint.rabbitmq.service`: :class:`RabbitMQNodeService`, the
  node as a Twisted service (start, readiness, restart after a death, stop).

``funcx-service`` runs its embedded broker with it; the test harness
(``testing/rabbitmq.py``) builds its synchronous nodes on the
first three.
"""
