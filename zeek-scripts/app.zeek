##! Application-layer timing on ports where the server speaks first
##! (*server_first_ports*): the darknet's first data (its banner) as the
##! sensor sees it leave, and the client's first data after it. A direct
##! client answers one path RTT after the banner (plus its own processing);
##! through a terminating proxy the banner travels on to the far client and
##! the answer comes back, so *tapp* grows by the proxy's onward leg.
##!
##! Mechanism, checked in zeek/zeek 7.0.11 and 8.0.10: ``tcp_contents`` is
##! raised only for connections whose responder port is in
##! ``tcp_content_delivery_ports_orig`` / ``_resp`` when the connection
##! starts (TCP_Reassembler's constructor reads the table; a port there also
##! turns reassembly on, TCPSessionAdapter::AddExtraAnalyzers). Those tables
##! are kept equal to *server_first_ports* here, so no handler runs for the
##! packets of other ports. Per packet, connection_first_ACK is raised before
##! the packet's payload is delivered (TCPSessionAdapter::DeliverPacket), so
##! a first ACK that carries data is held below before its data arrives.
##!
##! A held handshake goes out at the client's first data, else when
##! *app_wait* ends (Zeek also runs that timer when it stops). A FIN, a RST
##! or the connection's removal is not waited on: handlers for
##! connection_EOF, connection_reset or connection_state_remove here would
##! run for every connection (connection_EOF is raised for every reassembled
##! one once it has a handler; stack-less scanners reset half of a darknet's
##! connections), and on bench/zeek_overhead.py's capture that cost more
##! than the rest of this file. Waiting costs only latency, *app_wait* at
##! most.
##!
##! State: one entry per held handshake in *apps*, from the client's ACK
##! until its first data after the banner, or *app_wait*.

@load ./main
@load ./handshake

module StepStone;

export {
	## A handshake held for its banner exchange.
	type App: record {
		## The handshake, finished but for *tapp* and *app_data*.
		info: HandshakeInfo;
		## When the darknet's first data was seen.
		banner: time &optional;
		## The first *max_app_data* bytes of client data sent before the
		## banner (the client spoke first).
		early: string &optional;
	};

	## Held handshakes, keyed by uid. Exported so that its size can be
	## watched, like *tracks*: it holds at most the ACKed handshakes of
	## one *app_wait* on *server_first_ports*.
	global apps: table[string] of App;

	## Raised *app_wait* after the client's ACK.
	global app_timeout: event(uid: string);
}

# Ports this script put into each content delivery table. An operator's own
# entries there are left alone.
global added_orig: set[port];
global added_resp: set[port];

# Makes the ports of *ours* in *t* follow *ports*.
function sync_ports(t: table[port] of bool, ours: set[port], ports: set[port])
	{
	local gone: vector of port = vector();
	for ( p in ours )
		if ( p !in ports )
			gone += p;

	for ( i in gone )
		{
		delete t[gone[i]];
		delete ours[gone[i]];
		}

	for ( p in ports )
		{
		if ( get_port_transport_proto(p) == tcp && p !in t )
			{
			t[p] = T;
			add ours[p];
			}
		}
	}

function deliver_contents(ports: set[port])
	{
	sync_ports(tcp_content_delivery_ports_orig, added_orig, ports);
	sync_ports(tcp_content_delivery_ports_resp, added_resp, ports);
	}

function server_first_ports_changed(id: string, new_value: set[port]): set[port]
	{
	deliver_contents(new_value);
	return new_value;
	}

event zeek_init()
	{
	# Here rather than in a redef: the option's final value (site redefs
	# included) is known only now, and it may change at run time.
	deliver_contents(server_first_ports);
	Option::set_change_handler("StepStone::server_first_ports",
	    server_first_ports_changed);
	}

function release(uid: string)
	{
	local a = apps[uid];
	delete apps[uid];
	publish_handshake(a$info);
	}

function hold_for_app(h: HandshakeInfo): bool
	{
	if ( h$resp_p !in server_first_ports )
		return F;

	apps[h$uid] = App($info=h);
	schedule app_wait { StepStone::app_timeout(h$uid) };
	return T;
	}

event tcp_contents(c: connection, is_orig: bool, seq: count, contents: string)
	{
	if ( c$uid !in apps )
		return;

	local a = apps[c$uid];

	if ( ! is_orig )
		{
		if ( ! a?$banner )
			a$banner = network_time();
		return;
		}

	local now = network_time();

	# Data before the banner answers nothing. SSH clients (OpenSSH, Go's
	# x/crypto/ssh, paramiko) send their version at once; their next data,
	# the key exchange, answers the banner's. Nor can data that comes a
	# quarter of the handshake's RTT after the banner answer it: the banner
	# had not reached the client when it was sent (a version racing the
	# banner; an answer needs the whole RTT, a quarter leaves room for a
	# handshake slowed by queues). The first bytes still say who the client
	# is.
	if ( ! a?$banner || ( a$info?$tp && now - a$banner < a$info$tp / 4 ) )
		{
		if ( ! a?$early )
			a$early = sub_bytes(contents, 1, max_app_data);
		return;
		}

	a$info$tapp = now - a$banner;
	a$info$app_data = encode_base64(a?$early ? a$early : sub_bytes(contents, 1,
	    max_app_data));
	release(c$uid);
	}

event StepStone::app_timeout(uid: string)
	{
	if ( uid in apps )
		release(uid);
	}
