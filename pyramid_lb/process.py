"""What the dispatcher and the instances it spawns tell each other."""

#: Set for each spawned instance: its id (``request.lb_instance``).
INSTANCE_ENV = "PYRAMID_LB_INSTANCE"
#: Set for each spawned instance: the pid it must not outlive.
PARENT_ENV = "PYRAMID_LB_PARENT"
#: Set for each spawned instance: the dispatcher's address, added to
#: ``pyramid_lb.trusted_proxies`` so that it applies its forwarded headers.
TRUSTED_PROXIES_ENV = "PYRAMID_LB_TRUSTED_PROXIES"

#: The exit status of an instance whose port was taken between the moment the
#: supervisor found it free and its bind: no fault of the app's.
PORT_IN_USE = 3
