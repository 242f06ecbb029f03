# The port-sharding talk's echo server in Ruby: TCPServer on a port it binds itself; each
# client's first line comes back prefixed with this process's pid. Usage: ruby echo_server.rb PORT
require "socket"

server = TCPServer.new(Integer(ARGV.fetch(0)))
loop do
  client = server.accept
  begin
    line = client.gets
    client.write("#{Process.pid} #{line}") if line
  rescue SystemCallError
    # the client went away
  ensure
    client.close
  end
end
