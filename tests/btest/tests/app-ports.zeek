# Zeek delivers payload (tcp_contents) for the ports in
# tcp_content_delivery_ports_orig/_resp only: app.zeek keeps those tables
# equal to StepStone::server_first_ports, as the operator finally set it
# (a redef after the package's) and as it changes at run time
# (Option::set, as the config framework does), and leaves an entry the
# operator put there on its own. Checked on Zeek 8.0.10 and 7.0.11.
#
# @TEST-EXEC: zeek -b $PACKAGE %INPUT > output
# @TEST-EXEC: btest-diff output

redef StepStone::websocket_port = 0/tcp;
redef StepStone::server_first_ports += {2222/tcp};
redef tcp_content_delivery_ports_orig += {[110/tcp] = T};

function show(label: string)
	{
	local orig: vector of count = vector();
	local resp: vector of count = vector();
	for ( p in tcp_content_delivery_ports_orig )
		orig += port_to_count(p);
	for ( p in tcp_content_delivery_ports_resp )
		resp += port_to_count(p);
	print label, sort(orig), sort(resp);
	}

event zeek_init() &priority=-10
	{
	show("start");
	Option::set("StepStone::server_first_ports", set(22/tcp, 110/tcp, 53/udp));
	show("changed");
	}
